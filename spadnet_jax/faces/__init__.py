"""Real face photos: dlib detection and 68-point landmarks, the literature's face crop,
alignment to the model's frame and feathered paste-back (the `faces` extra)."""
