"""The functional core: money, account states and every rule as pure functions.

No threads, no I/O, no clock, no randomness: time and ids come in as arguments. A
decision returns data (the events to record) or raises a typed refusal; the shell
(`actors`, `persistence`) applies it."""
