//! The snapshot core's backends on a real COW file and source image.
