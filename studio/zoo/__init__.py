"""The zoo: a small bundled model family (a base and four domain experts) so the studio works offline."""
