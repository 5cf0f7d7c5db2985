"""One module per `sweep` subcommand; each exposes `register(subparsers)`.

A command module imports its heavy dependencies (torch, optuna) inside its handler so that
`sweep --help` stays fast and one broken area cannot break the others.
"""
