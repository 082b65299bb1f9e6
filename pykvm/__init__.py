"""pykvm: a pure-Python userspace hypervisor on Linux KVM."""

__version__ = "0.1.0"
