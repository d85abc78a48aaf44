"""Work against an Auth0 tenant's Management API: deploy the Action, verify synchronization."""
