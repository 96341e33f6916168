"""Lightning training recipes (classification, detection): modules, data modules, configs and the CLI entry point."""
