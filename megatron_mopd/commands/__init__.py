"""One module per `mopd` verb: `add_arguments(parser)` (no heavy imports) and `run(args)`."""
