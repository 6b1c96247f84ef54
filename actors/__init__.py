"""The imperative shell around the core: account actors on a small pool of threads, the
registry that activates and passivates them, and the `Engine` facade that the gateway,
the strategy engine (embedding API) and the perf harness all call."""
