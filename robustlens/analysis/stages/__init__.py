"""Analysis stages: one module per stage, each with one public ``run(context, config)`` entry point."""
