"""Data path: SAR records -> tokens -> indexed dataset -> samples."""
