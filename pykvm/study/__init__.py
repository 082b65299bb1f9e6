"""`pykvm ft study` and `pykvm ft report`: FT measured from outside the guest (see study.py)."""
