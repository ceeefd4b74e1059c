"""defectforge evaluate stage."""
