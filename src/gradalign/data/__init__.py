"""Problems and where they come from: the `Problem` record and chunk schedule (`problems`),
problem files (`files`), built-in task families and data regimes (`tasks`), rewards (`rewards`)."""
