"""Moving a machine's state between processes: snapshot files, the framed replication wire
format (sans-IO), live migration."""
