"""Batch jobs in the database and on the broker: tables, queries by concern, intake of submissions,
recovery of stalled chunks, the broker protocol and its client, training-run records, API tokens.
"""
