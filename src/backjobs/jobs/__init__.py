"""The jobs' logic, one module per job: a frozen ``<Job>Result`` and plain keyword-only
functions that take the engine or session, ``now`` and ``settings``. Pure rules (the
recurrence of a recurring transaction) sit beside the job that uses them."""
