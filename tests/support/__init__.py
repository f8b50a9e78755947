"""Reusable test infrastructure that drives REAL peers (Orthanc, DCMTK, PostgreSQL, Redis), no mocks."""
