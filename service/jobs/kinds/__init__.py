"""The job types, one module each; `service.jobs.catalogue.JOB_TYPES` lists them."""
