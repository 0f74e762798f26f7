"""The ``embassy`` command's handlers, one module per command family, with what they share:
:mod:`~embassy.commands.inputs` (files, stdin/stdout, argument types),
:mod:`~embassy.commands.keys` (passphrase and private keys) and
:mod:`~embassy.commands.policy` (the trust-policy flags). :mod:`embassy.cli` assembles them and
maps errors to exit codes. Each handler imports the library lazily, so ``embassy verify``
never loads daemon dependencies."""
