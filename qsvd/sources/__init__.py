"""Where models come from when no hub is at hand: built here from shipped descriptions (`random_model`)."""
