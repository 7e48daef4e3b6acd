"""Multitask loss weighting and gradient surgery, one method per file behind one interface."""
