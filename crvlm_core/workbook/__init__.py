"""App: the headless runner of the numbered workbook notebooks (papermill)."""
