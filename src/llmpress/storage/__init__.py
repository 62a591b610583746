"""How compressed linears are stored: the storage-form interface (:mod:`.form`), the
integer-grid codec maths (:mod:`.grid`) and one file per form (:mod:`.forms`)."""
