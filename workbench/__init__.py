"""Front ends of the Model Forensics Workbench: the CLI, the Qt application and the PDF renderer."""
