"""(in progress)"""
TRANSLATIONS = {}
