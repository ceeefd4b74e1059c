"""defectforge finetune stage."""
