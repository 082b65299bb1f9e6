"""The test guests: name -> one-line description, in presentation order."""

GUESTS: dict[str, str] = {
    "hello": "prints a greeting, its command line and memory size, then exits 0",
    "compute": "CPU-bound sieve and CRC32 at CPL3 that checks its own result (rounds=N)",
    "timer": "checks PIT and LAPIC timer interrupt rates against the TSC",
    "dirty": "dirties pages=N pages at CPL3 and checks none lost a write (seconds=S, stride=K)",
    "smp": "starts every AP with INIT-SIPI-SIPI and waits for all to check in (cpus=N)",
    "pio": "count=N writes (mode=in: reads) at CPL3 on port=P (default 0x80, which has no device): one VM exit each",
    "blk": "writes, flushes and reads back a pattern on the first virtio-blk disk (seed=N start=S sectors=N)",
    "blkbench": "timed 64 KiB sequential and 4 KiB random reads/writes on the first virtio-blk disk (bench/blk.py)",
    "net-echo": "answers ARP, ping and UDP echo (port 7) on the first virtio-net device (ip=A.B.C.D/N count=N)",
    "iozone": "IOzone-like buffered+fsync or O_SYNC writes on virtio-blk, a UDP report after each (pykvm ft study)",
    "tcp-echo": "echoes every byte on TCP port 7 on the first virtio-net device (the guest library's TCP; count=N)",
    "kv": "a durable key-value log on virtio-blk served over UDP and TCP port 9000 on virtio-net (put/get)",
}

# The options a guest cannot run without (it would boot only to report a missing device), and a
# command line that gives them.
NEEDS: dict[str, tuple[str, ...]] = {
    "blk": ("--disk",),
    "blkbench": ("--disk",),
    "net-echo": ("--net",),
    "kv": ("--disk", "--net"),
}
NEEDS_EXAMPLE: dict[str, str] = {
    "blk": "--disk disk.img",
    "blkbench": "--disk disk.img",
    "net-echo": "--net tap:tap0",
    "kv": "--disk kv.img --net socket:/tmp/kv.sock",
}
