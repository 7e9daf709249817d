"""Reports: plots (matplotlib, Agg, imported lazily) and HTML reports built from saved results."""
