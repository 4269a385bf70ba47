# %% [markdown]
# # Your first SAE on a real model
# placeholder
# %%
print(1)
