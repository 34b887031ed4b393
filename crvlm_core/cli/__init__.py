"""App: the `crvlm` command line (fit, eval, serve, workbook, models, datasets)."""
