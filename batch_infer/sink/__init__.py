"""Where predictions go: the output layout, its records and the exactly-once protocol."""
