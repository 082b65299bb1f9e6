"""Host-side helpers for the demo, the benchmarks and the tests: frames as a host sees them,
and a fake device platform for device tests without /dev/kvm."""
