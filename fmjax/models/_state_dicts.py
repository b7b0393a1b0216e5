"""The one error a parameter mapping raises when the names or shapes it is given are not the
ones it expects. Private to :mod:`fmjax.models`."""

from collections.abc import Mapping


def check_names(
    expected: Mapping[str, tuple[int, ...]],
    given: Mapping[str, tuple[int, ...]],
    what: str,
    *,
    hint: str | None = None,
    as_given: Mapping[str, str] | None = None,
) -> None:
    """Raises one ``ValueError`` whose message, after ``what`` (what ``given`` then is not),
    names every name of ``expected`` missing from ``given`` (with the expected shape), every
    name of ``given`` not in ``expected``, and every name of both whose shapes differ (with both
    shapes). Does nothing when the names and shapes agree.

    ``expected`` and ``given`` map names to shapes; names of ``given`` are shown as ``as_given``
    maps them (the names the caller passed, before any renaming). With a ``hint`` (for a
    checkpoint's state dict, of perhaps thousands of names) the message counts the three lists,
    gives the hint, then lists the names one a line; without, it holds the three lists inline.

    Example:
        >>> from fmjax.models._state_dicts import check_names
        >>> check_names({"w": (2, 3), "b": (3,)}, {"w": (3, 2), "x": ()}, "not the network")
        Traceback (most recent call last):
        ...
        ValueError: not the network: missing ['b (3,)'], unexpected ['x'],
        mis-shaped ['w: got (3, 2), expected (2, 3)'].
    """
    shown = {name: name for name in given} if as_given is None else as_given
    missing = [f"{name} {shape}" for name, shape in expected.items() if name not in given]
    unexpected = sorted(shown[name] for name in given if name not in expected)
    misshaped = [
        f"{shown[name]}: got {tuple(given[name])}, expected {shape}"  # a torch.Size prints otherwise
        for name, shape in expected.items()
        if name in given and tuple(given[name]) != shape
    ]
    if not (missing or unexpected or misshaped):
        return
    if hint is None:
        raise ValueError(
            f"{what}: missing {missing}, unexpected {unexpected}, mis-shaped {misshaped}."
        )
    lists = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
    raise ValueError(
        f"{what}: {len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} "
        f"mis-shaped. {hint}\n"
        + "".join(
            f"{title}:\n  " + "\n  ".join(names) + "\n" for title, names in lists if names
        ).rstrip()
    )
