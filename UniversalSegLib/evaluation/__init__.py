"""Evaluating a model beyond its training scans: variants of real CTs (`variants`)."""
