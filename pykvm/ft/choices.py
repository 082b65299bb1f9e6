"""What a user chooses or meets of FT on the command line, in a module that imports nothing: the
CLI's parser reads it without loading FT (numpy, the wire) for every command."""

SYNC_MODES = ("sync", "pipelined", "cow")  # --ft-mode: what the guest waits for at a sync (ft.primary)
DISK_MODES = ("replicated", "shared")  # --ft-disk: where the standby's disks come from (ft.disk_mode)
EXIT_FENCED = 75  # sysexits' EX_TEMPFAIL: this side stood down; the other one runs the guest (ft.fencing)
MIN_RECORDS = 1  # pykvm demo --records: the kill falls on one of the records, so one is enough
MAX_RECORDS = 100_000  # each takes a few milliseconds; kv's log holds far more
