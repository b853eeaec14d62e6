"""Robustness evaluation of trained models: attacks, noise, weight perturbations, reports."""
