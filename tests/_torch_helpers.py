"""What the parity tests against the peers' PyTorch networks share: random weights moved off
their initial values, and the relative error of two outputs.

Test modules import it, after their own ``pytest.importorskip("torch")``, as
``from _torch_helpers import ...`` (pytest puts ``tests/`` on ``sys.path``). Without torch it
is skipped, as pytest also collects it for doctests.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def perturb(net, seed=0):
    """``net`` with standard normal noise times 0.05 (from ``seed``) added to every parameter,
    so that zero-initialised layers and unit scales are no longer at their initial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return net


def relative_error(ours, theirs):
    """The largest difference of two outputs over the largest value of ``theirs``."""
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())
