"""Job mode: one fresh container per request, sealed from birth, destroyed with a statement.

- :mod:`embassy.jobs.containers`: the Docker edge (create sealed, warm pool, destroy and
  check gone, sweep at start);
- :mod:`embassy.jobs.records`: what the log says of each job (pure over statements);
- :mod:`embassy.jobs.service`: the lifecycle (assign, release keys, commit, deadline);
- :mod:`embassy.jobs.result`: the reply key and the result key (HPKE to the user).

docs/adr/0014-jobs.md has the design.
"""
