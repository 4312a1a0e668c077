"""The trio layer: sockets, tasks and timers that drive the pure core."""
