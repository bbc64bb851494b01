"""Request and response schemas, one module per resource; they validate input and document
every route in OpenAPI.

Nothing is re-exported here: views import from the resource's module (``api.schemas.jobs``,
``api.schemas.common``...), so where a schema lives is visible at the import and a new schema
needs no second edit here.
"""
