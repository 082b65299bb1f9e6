"""Moving a machine's state between processes: snapshot files, the framed replication wire
format (sans-IO) with its page arena and tcp: addresses, live migration."""
