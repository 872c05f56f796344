"""Evaluation of a world model against ground-truth re-rendered futures of the synthetic worlds
(``jobs/evaluate.py``): action-following accuracy, drift (PSNR / SSIM per chunk), ablations."""
