"""DICOMweb: STOW-RS out (results to a DICOMweb archive) and in (a STOW-RS endpoint beside the listener)."""
