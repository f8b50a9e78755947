"""The site loop (issue 17): reader feedback, reference labels, local validation.

Imports the kernel (service.core) only; the dashboard (service.admin) and the command line use it.
"""
