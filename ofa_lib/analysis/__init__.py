"""Analysis stage: reports (01's data tables, 04_analysis, 05_measures, 06_unfreezing), plots, diagnoses."""
