"""One file per storage form, each registering a :class:`~llmpress.storage.form.StorageForm`
with ``@register_form("name")`` (found by :func:`llmpress.storage.form.get_form`; no list)."""
