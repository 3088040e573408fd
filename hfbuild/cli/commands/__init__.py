"""One module per `hfbuild` subcommand; each public function prints and returns an exit code."""
