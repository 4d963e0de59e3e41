"""Single source of truth for the job spec (`schemas.job`) and every Parquet schema
(`schemas.tables`). Import the submodules directly; this package imports nothing heavy."""
