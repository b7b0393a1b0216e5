"""Entry points users run (`python -m experiments.<name>`); each stays thin over `fmjax`."""
