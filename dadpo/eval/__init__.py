"""`dadpo eval`: did the student get better? Responses per model, a judge in both orders, win rates
against a baseline with honest statistics, and lm-evaluation-harness for the alignment tax."""
