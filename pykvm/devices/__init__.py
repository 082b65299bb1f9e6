"""Device models. Each sits on the I/O bus (pykvm.bus) and talks to the rest of the machine only
through the callables it is given (an interrupt line, an output sink, a reset request)."""
