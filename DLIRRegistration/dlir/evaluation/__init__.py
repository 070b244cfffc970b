"""Evaluating registrations: scores and reports (Dice, HD, ASD, TRE, folding), plots, the elastix baseline, measured runs and the benchmark."""
