"""Dataset indexers: one command per public dataset layout, plus ``folder.py`` for your own data.

Run ``python generate_dataset_json/<name>.py --root DATASET_ROOT`` to write
``DATASET_ROOT/meta.json`` (method §8) and print the per-class counts. The scripts are
``mvtec visa mpdd btad SDD DAGM DTD head_ct brainmri br35 covid isbi clinicDB colonDB kvasir
endoTect tn3k folder``; each one is a thin description of its layout. The walking, pairing,
validation and writing live in :mod:`generate_dataset_json.indexer`, the meta.json schema in
:mod:`generate_dataset_json.schema`, the shared command line in :mod:`generate_dataset_json.command`.
"""
